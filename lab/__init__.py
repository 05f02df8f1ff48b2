"""Offline fitting and measurement code: never imported by the served handler."""
