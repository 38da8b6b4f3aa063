"""One replica: pure scheduling policies, cost profiles and the simulated engine."""
