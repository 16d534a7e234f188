"""polarsparse.bench"""
