"""Usage metering: sample running leases, close intervals, keep signed records durably."""
