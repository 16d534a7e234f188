"""polarsparse.distributed"""
