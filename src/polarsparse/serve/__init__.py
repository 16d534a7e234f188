"""polarsparse.serve"""
