"""The command line (``cli``) and the commands that are not the daemon: ``dry-run``, ``explain``,
``check-config --connect`` (``connect``; ``listen`` for receiving ports), ``migrate`` (with
``migreport``) and ``retry`` (``putback``: failed files back into a drop folder; not the retry
policy, which is ``pipeline/backoff``).

May import: base, rules, config, media, dicomweb, pipeline, service.
"""
