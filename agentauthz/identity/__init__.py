"""Who is calling: SPIFFE X.509-SVIDs and trust bundles, JWT-SVID callers, the development CA.

May import only the shared vocabulary (errors, reasons, durable).
"""
