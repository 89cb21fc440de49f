"""Data: real-layout adapters, phantom cohorts, preparation, the slice cache, batch scheduling."""
