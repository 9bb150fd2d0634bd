"""The floor every other part stands on: artifacts passed between stages, errors and exit codes, files written
atomically, progress output, library versions, the cache folder, GGUF reading and CPU flags.
Nothing here imports another edgepack module."""
