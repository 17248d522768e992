"""The memory plan: what each GPU and reward actor needs, from the model configs alone."""
