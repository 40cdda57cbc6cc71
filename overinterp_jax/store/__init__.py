"""The I/O layer: what the package writes and reads back, trusted only when valid.

``atomic`` (atomic files, JSON, recordings of the files a stage touched), ``hashing``
(fingerprints of config parts, checksums of arrays and files), ``npz`` (array files that
carry their config's fingerprint and checksum), ``locks`` (one run per work directory),
``checkpoints`` (orbax checkpoints verified by their checksums). It imports nothing of
the package above it but ``sharding`` (``checkpoints`` gathers arrays to the host);
tests/test_layering.py holds it there.
"""
