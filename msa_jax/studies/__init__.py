"""Study harnesses: memories of a given size, MSA and pasted-context runs, summary statistics."""
