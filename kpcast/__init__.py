"""kpcast: the two-way call (``python -m kpcast call``), composed of the sender's and the receiver's halves.

The only package that imports both ``sender`` and ``receiver``; they never import each other.
"""
