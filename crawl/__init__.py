"""Web image acquisition: search engines, downloading, storage, manifests and the offline web world.

Nothing here reads params.yaml: every function takes plain typed arguments, so the package is usable
as a library and testable without YAML.
"""
