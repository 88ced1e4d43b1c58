"""Memory bank: the data stage 1 writes and stages 2-3 read; on-disk format; device routing index."""
