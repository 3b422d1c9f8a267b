"""Surgery layers: small Penzai layers inserted at named sites."""
