"""meshblock-mgmt: the management service (dashboard, alert history, users)."""
