"""The demo VLMs: their weights (v1/; v2/ once trained) and the code that builds, trains and measures them.

Nothing in the runtime imports this package: `elastic_ray.models.loading` finds the weight
folders by path, so serving a demo model never loads training code.
"""
