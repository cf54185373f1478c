"""`vigil ui`: a live page of the whole loop, read from the topics.

`model.py` keeps what the topics say in bounded memory (ring buffers per series),
`reader.py` follows the topics into it, `app.py` serves the page, a JSON snapshot and a
stream of changes, and `assets/` holds the page itself; `cli.py` is the command.
"""
