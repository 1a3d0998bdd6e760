"""Model families written against backend ops only."""
