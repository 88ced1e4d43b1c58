"""Token roles, in the official `doc_ids` convention (SPEC §2).

`doc_ids >= 1` marks a token of document d; the other roles are the constants below. Padding is
not a role: it is `attention_mask == 0` and is excluded from everything.
"""

QUERY = 0  # active token that routes (the question)
ACTIVE = -1  # active token that does not route (answers, generated text)
TEMPLATE = -2  # template / prefix token
FIRST_DOC = 1  # document ids start here
