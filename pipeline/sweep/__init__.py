"""Many runs: Ray Tune sweeps (`stkd tune`), studies (`stkd study`), search spaces and what both show while they run."""
