"""Which TensorFlow operations a cached backbone graph may contain, and the check of a graph.

A cached graph (covfeat.extraction.graphfile) is run as the user, and the only thing that
vouches for it besides its folder's ownership is this list: its SHA-256 sits in the same
folder, so whoever can write the folder can rewrite both.  A ``FunctionDef`` runs its nodes
and nothing else; a node reaches other code only through its op (a TensorFlow kernel, or a
function registered under that name) or through a function-valued attribute (``f`` of
``PartitionedCall``, the branches of ``If``, the body of ``While``).  So every op must be one
the four backbones' own traced graphs use, and no attribute may name a function: the graph
then cannot read or write a file, start a process or call back into Python.
"""

from __future__ import annotations

from covfeat.core.errors import CovfeatError

# Every op type in the traced forward graphs (their FunctionDef's nodes; the GraphDef adds
# only its Placeholder, and has no function library) of the four registered backbones with
# --weights none, as covfeat.extraction.graphfile traces them, on TensorFlow 2.21.0 and
# Keras 3.15.1, in float32 and by the bfloat16 ``mixed`` route (which adds only ``Cast``:
# variables and inputs to bfloat16, the feature maps back to float32) and ``mixed_fused_bn``
# route (which adds ``FusedBatchNormV3``, a pure arithmetic kernel).  Made by tracing each backbone and collecting ``{n.op for n in
# concrete.function_def.node_def}``; tests/test_bytes_graph.py rebuilds them and checks that
# they are within this set.  A TensorFlow that traces to an op outside it is not a threat,
# only a graph this cache does not keep (graphfile says so in a note and builds with Keras).
ALLOWED_OPS = frozenset({
    "AddV2", "AvgPool", "BiasAdd", "Cast", "ConcatV2", "Const", "Conv2D", "FusedBatchNormV3", "Identity", "MaxPool",
    "Mul", "NoOp", "Pad",
    "ReadVariableOp", "Relu", "Reshape", "Rsqrt", "Squeeze", "Sub",
})


# Ops that read or write files (or memory-map them), print or dump to a file, call Python, or
# call another function (whose body this check would not see), named here although the
# allow-list already excludes them, so that no later widening of the allow-list can let one in
# unseen (tests/test_bytes_graph.py checks that each is a real TensorFlow op).
FORBIDDEN_OPS = frozenset({
    # files
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "Save", "SaveV2", "SaveSlices", "Restore",
    "RestoreV2", "RestoreSlice", "MergeV2Checkpoints", "ShardedFilename", "InitializeTableFromTextFile",
    "InitializeTableFromTextFileV2", "WholeFileReaderV2", "TextLineReaderV2", "FixedLengthRecordReaderV2",
    "TFRecordReaderV2", "ReaderReadV2", "TFRecordDataset", "TextLineDataset", "FixedLengthRecordDataset",
    "LoadAndRemapMatrix", "CreateSummaryFileWriter", "WriteSummary", "WriteScalarSummary", "WriteRawProtoSummary",
    "WriteGraphSummary", "PrintV2", "DebugIdentityV2",
    # Python callbacks
    "PyFunc", "PyFuncStateless", "EagerPyFunc",
    # calls of other functions
    "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf", "While", "StatelessWhile", "Case",
    "StatelessCase", "RemoteCall", "SymbolicGradient",
})


class UntrustedGraph(CovfeatError):
    """A cached graph holding an op that covfeat's backbones never use.  Not a ``ValueError``:
    a damaged entry is made again, this one was written by someone, and is refused."""


def unlisted(fdef) -> str | None:
    """The first node of a ``FunctionDef`` that the lists refuse, said in words (a forbidden op,
    an op outside :data:`ALLOWED_OPS`, an attribute that names a function), or None."""
    for node in fdef.node_def:
        if node.op in FORBIDDEN_OPS:
            return f"op {node.op} (a file, Python or function-call op)"
        if node.op not in ALLOWED_OPS:
            return f"op {node.op} (not an op of covfeat's backbones)"
        for name, value in node.attr.items():
            if value.HasField("func") or len(value.list.func):
                return f"a call of another function (op {node.op}, attribute {name})"
    return None


def check_ops(fdef, source) -> None:
    """Refuse a cached ``FunctionDef`` that :func:`unlisted` refuses, naming the node and
    ``source`` (the graph's file) and the way out."""
    bad = unlisted(fdef)
    if bad:
        raise UntrustedGraph(f"the cached backbone graph {source} holds {bad}: someone wrote into your graph cache, "
                             f"so it is not run; delete {source.parent} and check who can write that folder.")
