"""What every stage uses and none owns: the error hierarchy, how a setting is declared and
checked, fingerprints of settings and files, file safety (atomic files and folders, fsync,
liveness of the processes that wrote them, covfeat's user-cache root), and TensorFlow's quiet
import.  It imports nothing else of covfeat."""

__version__ = "0.1.0"
