"""The long-running daemon around the pipeline: threads, signals and reload (``daemon``),
systemd (``notify``), log lines (``logs``), the metrics served over HTTP (``metrics``), the
status page (``page``: its data and HTML; ``web``: its HTTP listener, and ``static/``),
retention of ``sent/`` (``purge``), and what ``stowd status`` reads while it runs
(``status``, ``inflight``).

May import: base, rules, config, media, dicomweb, pipeline.
"""
