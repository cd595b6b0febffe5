"""Store backends: ``local`` (a directory), ``s3`` (boto3; checkpoint data as parallel
single-PUT segments),
``fsspec`` (any other fsspec URL) and ``mirror`` (local first, remote in the background).
The interface and the dispatch are in :mod:`spotsafe.storage.base`."""
