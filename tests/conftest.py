"""Test setup: 8 simulated CPU devices, so sharding runs on real multi-device meshes; a data
directory private to the test session (LM_DATA_DIR, unless the caller sets one to reuse)."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("LM_DATA_DIR", tempfile.mkdtemp(prefix="lm-test-data-"))
