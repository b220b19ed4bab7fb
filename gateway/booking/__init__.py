"""The booking side's services: reservations, commands to the cars, the start-time unlock."""
