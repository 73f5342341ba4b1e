"""The notifier: emails patients about what happens to them, exactly once each."""
