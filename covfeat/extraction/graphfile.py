"""The backbone's traced forward graph and its weights, kept so that extraction skips Keras.

Before its first forward pass, extraction used to spend 2-6 s on one core getting a
backbone ready: Keras builds the model layer by layer (densenet201: 2.0 s), TensorFlow
traces its call into a graph (1.8 s) and instantiates it.  On 96 files that is a sixth of
the work.  The traced graph (a ``FunctionDef``, 0.5-1.2 MB) and the values of the
variables it reads are a pure function of the backbone, its weights, the seed and the
Keras and TensorFlow versions, so the first extraction with a given backbone keeps them in
covfeat's user cache (``$COVFEAT_GRAPH_CACHE``, else ``$XDG_CACHE_HOME/covfeat/backbones``,
else ``~/.cache/covfeat/backbones``; 90-220 MB per backbone and weights) and later runs
register the graph with TensorFlow's runtime and call it directly: 0.5-1.7 s.

The graph is the one Keras traced, run on the same weights, so the features are the same,
bit for bit (tests/test_graphfile.py).  Every file is checked against its SHA-256 before
use; an entry that fails is made again with a note on stderr.  That SHA-256 sits in the
same folder, so it finds damage, not intent: whoever can write the folder can rewrite the
graph and its hash alike, and the graph runs as the user.  What a cached graph is trusted on
is therefore (1) the folder: the cache folder, each entry and their ancestors must belong to
the user (or root) and be writable by no one else (``fsutil.private_dir``; covfeat makes its
folders 0o700), else the run stops with one line; and (2) its ops: every node must be an op
that the four backbones' own graphs use, with no file, Python-callback or function-call op
(:mod:`covfeat.extraction.graphops`).  A graph that fails (2) is refused, not rebuilt: someone
wrote it, and the user should learn so (tests/test_bytes_graph.py).  Each run also sweeps
the temporary folders of builds whose process is gone (a killed build leaves 90-220 MB).
Registering and calling a
``FunctionDef`` goes through TensorFlow's eager context (``add_function_def``,
``call_function``), the calls ``tf.function`` itself makes; the test above pins them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from covfeat.core.fingerprint import fingerprint, keras_settings, keras_versions, sha256_bytes
from covfeat.core.fsutil import AtomicDir, private_dir, remove_stale, user_cache
from covfeat.extraction.backbones import build_backbone
from covfeat.extraction.graphops import check_ops, unlisted
from covfeat.imaging.decode import INPUT_SIZE

FORMAT = 1


GRAPH = "forward.pb"


WEIGHTS = "weights.bin"


LAYOUT = "layout.json"


ALIGN = 64  # each variable's bytes start on a cache line


ENV = "COVFEAT_GRAPH_CACHE"


WHAT = "backbone graph cache"


def cache_root() -> Path:
    return user_cache(ENV, "backbones")


def graph_key(backbone, spec, seed: int, route: str = "float32") -> tuple[str, dict]:
    """What the traced forward graph and its weights depend on, and its hash: the backbone,
    its weights' identity, the seed, the precision's route (:mod:`covfeat.extraction.precision`:
    the ``onednn`` route traces the float32 graph but runs it otherwise, and is kept apart all
    the same, so an entry always says how its features were computed), the input and feature
    shapes, the Keras and TensorFlow versions and settings, and the bytes of the code that
    builds and traces it."""
    here = Path(__file__).parent
    what = {"format": FORMAT, "backbone": backbone.name, "builder": getattr(backbone.build, "__name__", "?"),
            "weights": spec.identity, "seed": seed, "route": route, "input": [INPUT_SIZE, INPUT_SIZE, 3],
            "feature_shape": list(backbone.feature_shape), "keras_settings": keras_settings(), **keras_versions()}
    return fingerprint(what, files=[here / "backbones.py", here / "graphfile.py", here / "precision.py"],
                       length=20), what


def _layout_digest(layout: dict) -> str:
    return fingerprint({k: layout[k] for k in ("what", "variables", "graph_sha256", "weights_sha256")})


class Uncacheable(Exception):
    """A traced graph that this cache cannot hold whole (it calls other functions, or reads
    tensors that are not the model's variables)."""


class Forward:
    """The backbone's forward pass, ``forward(batch) -> features`` (a tensor), on float32
    batches of any size.  ``source`` says where it came from: ``"keras"`` (built and traced
    now) or ``"cache"`` (the graph Keras traced on an earlier run, loaded)."""

    def __init__(self, call, source: str, folder: Path | None):
        self._call, self.source, self.folder = call, source, folder

    def __call__(self, batch):
        return self._call(batch)


def backbone_forward(backbone, spec, seed: int = 0, route: str = "float32") -> Forward:
    """The forward pass of the frozen backbone with these weights, computing by ``route``: from
    the graph cache, or built with Keras now (and kept in the cache for the next run).  The
    caller has readied the process for the route (:func:`covfeat.extraction.precision.prepare_process`)."""
    import tensorflow as tf

    key, what = graph_key(backbone, spec, seed, route)
    folder = cache_root() / key
    try:
        private_dir(folder.parent, WHAT, ENV)  # before anything in it is read (UnsafeFolder stops the run)
    except OSError as exc:
        folder = None  # it cannot be made: nothing to read, and nowhere to keep the graph
        unkept = exc
    if folder is not None:
        remove_stale(folder.parent)  # the builds of killed runs, which no later build of theirs may sweep
        if folder.is_dir():
            try:
                return Forward(_load(folder, what), "cache", folder)
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
                discard(Forward(None, "cache", folder), exc)
    model = build_backbone(backbone, spec, seed=seed, route=route)
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32)])
    concrete = fn.get_concrete_function()
    try:
        if folder is None:
            raise unkept
        _save(folder, concrete, model, what)
    except Uncacheable as exc:
        print(f"note: the traced graph of {backbone.name} is not kept ({exc}); every extraction builds it with "
              "Keras.", file=sys.stderr, flush=True)
    except OSError as exc:
        print(f"note: cannot keep the backbone graph in {cache_root()} ({exc.strerror or exc}); the next "
              f"extraction builds it with Keras again (set {ENV} to a writable folder).",
              file=sys.stderr, flush=True)
    return Forward(fn, "keras", None)


def discard(fwd: Forward, exc: BaseException) -> None:
    """Remove a cached graph that cannot be used, with a note; the caller builds it again."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    shutil.rmtree(fwd.folder, ignore_errors=True)
    tail = ("building it with Keras and keeping it again." if not fwd.folder.exists() else
            f"building it with Keras; it cannot be removed, delete {fwd.folder} by hand.")
    print(f"note: the backbone graph {fwd.folder} is unusable ({reason}); {tail}", file=sys.stderr, flush=True)


def _prune(folder: Path, what: dict) -> None:
    """Remove the entries of the same backbone, weights, seed and route under other keys (an
    older covfeat, Keras or TensorFlow): each is 90-220 MB and no run of this install reads it.
    (Entries from before routes existed are float32's.)"""
    same = {k: what[k] for k in ("backbone", "weights", "seed", "route")}
    for other in folder.parent.iterdir():
        if other == folder or other.name.startswith(".") or not other.is_dir():
            continue
        try:
            old = json.loads((other / LAYOUT).read_text())["what"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if {k: old.get(k, "float32" if k == "route" else None) for k in same} == same:
            shutil.rmtree(other, ignore_errors=True)


def _save(folder: Path, concrete, model, what: dict) -> None:
    """The traced graph and, in the order the graph takes them, the values of its variables."""
    by_handle = {id(v.value.handle): v for v in model.weights}
    captured = list(concrete.captured_inputs)
    missing = [i for i, h in enumerate(captured) if id(h) not in by_handle]
    if missing:
        raise Uncacheable(f"it reads {len(missing)} tensor(s) that are not the model's variables")
    if concrete.graph.as_graph_def().library.function:
        raise Uncacheable("it calls other functions")
    bad = unlisted(concrete.function_def)
    if bad:  # a load would refuse it: a TensorFlow or Keras that traces to ops the allow-list lacks
        raise Uncacheable(f"it holds {bad}, outside covfeat.extraction.graphops.ALLOWED_OPS")
    values = [np.ascontiguousarray(by_handle[id(h)].numpy()) for h in captured]
    variables, offset = [], 0
    for v in values:
        variables.append({"shape": list(v.shape), "dtype": v.dtype.str, "offset": offset})
        offset += -(-v.nbytes // ALIGN) * ALIGN
    blob = np.zeros(offset, np.uint8)
    for v, meta in zip(values, variables):
        blob[meta["offset"]:meta["offset"] + v.nbytes] = np.frombuffer(v.tobytes(), np.uint8)
    graph = concrete.function_def.SerializeToString(deterministic=True)
    with AtomicDir(folder.parent, folder.name, taken="keep") as entry:
        tmp = entry.path
        tmp.chmod(0o700)  # the entry is checked as private on every load (fsutil.private_dir)
        (tmp / GRAPH).write_bytes(graph)
        blob.tofile(tmp / WEIGHTS)
        layout = {"what": what, "variables": variables, "graph_sha256": sha256_bytes(graph),
                  "weights_sha256": sha256_bytes(blob)}
        layout["layout_sha256"] = _layout_digest(layout)
        (tmp / LAYOUT).write_text(json.dumps(layout, indent=1))
    _prune(folder, what)


def _load(folder: Path, what: dict):
    """Register the cached graph under a name of its own and return a call of it on the
    cached weights (held in this process's variables)."""
    import tensorflow as tf
    from tensorflow.core.framework import function_pb2
    from tensorflow.python.eager import context

    private_dir(folder, WHAT, ENV)
    layout = json.loads((folder / LAYOUT).read_text())
    if layout.get("layout_sha256") != _layout_digest(layout):
        raise ValueError("layout checksum differs")
    if layout["what"] != json.loads(json.dumps(what)):
        raise ValueError("made for other settings")
    graph = (folder / GRAPH).read_bytes()
    blob = np.fromfile(folder / WEIGHTS, np.uint8)
    if sha256_bytes(graph) != layout["graph_sha256"] or sha256_bytes(blob) != layout["weights_sha256"]:
        raise ValueError("checksum differs")
    fdef = function_pb2.FunctionDef()
    fdef.ParseFromString(graph)
    check_ops(fdef, folder / GRAPH)  # before TensorFlow sees it: an UntrustedGraph stops the run
    if len(fdef.signature.input_arg) != 1 + len(layout["variables"]) or len(fdef.signature.output_arg) != 1:
        raise ValueError("graph and weights do not match")
    handles = []
    for meta in layout["variables"]:
        dt = np.dtype(meta["dtype"])
        n = int(np.prod(meta["shape"], dtype=np.int64))
        value = blob[meta["offset"]:meta["offset"] + n * dt.itemsize].view(dt).reshape(meta["shape"])
        handles.append(tf.Variable(value, trainable=False))
    # The traced name (__inference_<lambda>_N) is only unique within the process that traced
    # it; this one is the graph's own hash, so one name never stands for two graphs.
    name = f"covfeat_backbone_{layout['graph_sha256'][:24]}"
    fdef.signature.name = name
    ctx = context.context()
    if not ctx.has_function(name):
        ctx.add_function_def(fdef)
    inputs = [v.handle for v in handles]
    encoded = name.encode()

    def call(batch):
        return ctx.call_function(encoded, [tf.convert_to_tensor(batch, tf.float32), *inputs], 1)[0]

    call.variables = handles  # keep the variables alive as long as the call
    return call
