"""Training data, apart from the library: `store` (the dataset folder's files, writers and readers), `prepare`
(`lmdiff prepare`: videos -> dataset), `a2l_dataset` and `l2v_dataset` (the trainers' datasets, reading through the
store). Import from the submodules."""
