"""Widgets of the console: the virtual order table and the order detail panel."""
