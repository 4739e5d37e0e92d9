"""The configuration: its frozen, typed objects and their defaults (``model``), and reading
them from YAML once at start with every problem named by key and line (``load``, the
``yamlwalk`` walker, ``ruleconfig`` for ``rules:``, ``access`` for logins, TLS and headers,
``secrets`` for where passwords come from, ``schedule`` for a destination's transfer
windows, ``httpconfig`` for the status page's listener and login).

May import: base, rules.
"""
