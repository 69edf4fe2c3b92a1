"""upcycle"""
