"""Delivery status notifications (bounces) for mail that cannot be delivered."""
