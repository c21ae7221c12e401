"""Connectors of emrestore to viewing platforms: the HTTP bridge for browsers, Neuroglancer,
webKnossos and CATMAID (see docs/connectors.md)."""
