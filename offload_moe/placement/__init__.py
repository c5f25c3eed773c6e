"""Where weights go: VRAM/RAM profiles, the memory planner, the budget checks, `Placement`."""
