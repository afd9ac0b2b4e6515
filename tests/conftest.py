import os

# Tests run on CPU; 8 host devices let the sharding tests build meshes (subsets of them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
