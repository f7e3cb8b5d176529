"""Tests of `augserver/`."""
