"""The offline demo, apart from the product: Fashion-MNIST rendered as a small web (``world``),
the loopback server that serves it (``mirror``), and the data the demo teacher trains on.

A real crawl never runs this code: the world stage writes only a marker when no crawl engine is
``mirror``, and the teacher stage reads Fashion-MNIST only when ``teacher.checkpoint`` is null.
"""
