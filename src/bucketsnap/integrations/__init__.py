"""Integrations with RL frameworks, one module each; a framework is imported only by its own module.

* :mod:`bucketsnap.integrations.sb3`: Stable-Baselines3 (``pip install 'bucketsnap[sb3]'``).
"""
