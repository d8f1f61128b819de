"""tau2-bench's airline, retail and telecom domains (``domain.py`` builds them)."""
