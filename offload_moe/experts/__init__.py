"""Where experts' weights come from: the flat layout, the host tiers, the device slot cache with its
eviction policies and prefetch (the one placement decision point), and the CPU/device cost model."""
