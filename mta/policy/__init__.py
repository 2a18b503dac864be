"""Who may send what through which listener: address syntax and relay rules."""
