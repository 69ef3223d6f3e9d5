"""Examples of your own family and dataset, loaded with --plugin examples.tc_vlae / examples.bars."""
