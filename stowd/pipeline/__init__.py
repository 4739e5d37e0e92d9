"""A file's way from a drop folder to ``sent/`` or ``failed/``: found (``watch``, which asks
``places`` what is wanted), queued (``queue``, the only home of SQL, on a disk watched for
room by ``disk``), read and given its metadata (``reader``, ``classify``, ``metadata``,
``sidecar``, ``lookup``), batched and sent (``worker``, ``group``, ``wire``, ``concurrency``,
``bulkform``, ``verify``), retried or given up (``filing``, ``backoff``, ``loop``), settled
(``settle``) and counted (``counters``).

May import: base, rules, config, media, dicomweb.
"""
