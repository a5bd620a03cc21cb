"""The report: tables and records from eval JSONs (tables), bootstrap intervals and paired tests (stats,
uncertainty) and matplotlib figures with the writers of the report's files (figures).

Layer 5: may import ``core`` and the stages below; it reads results, never re-scores.
"""
