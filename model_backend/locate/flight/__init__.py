"""A flight: many photos taken seconds apart, located one by one and then decoded together as a track."""
