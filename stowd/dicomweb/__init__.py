"""Talking to an archive over HTTP: a destination's client with its TLS and logins (``client``,
``auth``, ``googleauth``, ``awsauth``), the STOW-RS request (``stow``, ``stowbody``) and its
answer read and judged file by file (``answers``, ``stowanswer``), and httpx's errors in
stowd's words, translated once (``httperrors``).

May import: base, config.
"""
