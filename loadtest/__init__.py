"""Load and cost measurements for Sluice, run against a real server process."""
