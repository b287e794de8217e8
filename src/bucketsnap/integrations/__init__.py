"""Integrations with RL frameworks, one module each; a framework is imported only by its own module.

* :mod:`bucketsnap.integrations.sb3`: Stable-Baselines3 (``pip install 'bucketsnap[sb3]'``).
* :mod:`bucketsnap.integrations.tianshou`: tianshou 2.x's high-level ``Experiment`` (``pip install 'tianshou[eval]'``).

SB3's replay buffers are buffer kinds (:mod:`bucketsnap.buffers`) registered by ``_sb3_buffers``, which
:mod:`bucketsnap.buffers` imports by itself once SB3 has been imported.
"""
