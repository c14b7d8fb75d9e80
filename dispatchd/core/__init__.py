"""The dispatch core: instruction values, the lifecycle table, validation and the engine.

Nothing here touches a socket, a file or the clock: see :mod:`dispatchd.core.engine`.
"""
