"""Pure rules of the booking side: functions of their inputs and an injected time, no I/O."""
