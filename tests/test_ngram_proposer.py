import pytest

from edgellm.ngram_proposer import NgramProposer
from tests.fakes import make_seq


def test_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_match():
    seq = make_seq([1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 6, 1, 2, 3])
    # (1, 2, 3) occurred at the start and was followed by 9 9 5; (2, 3) later, followed by 7 8
    assert NgramProposer(4, min_n=2, max_n=3).propose(seq) == [9, 9, 5, 2]
    assert NgramProposer(4, min_n=2, max_n=2).propose(seq) == [7, 8, 6, 1]
    assert NgramProposer(2, min_n=2, max_n=3).propose(seq) == [9, 9]
    assert NgramProposer(4, min_n=2, max_n=3).propose(seq, limit=1) == [9]
    assert NgramProposer(4, min_n=2, max_n=3).propose(seq, limit=0) == []


def test_no_match_no_drafts_and_the_suffix_never_matches_itself():
    assert NgramProposer(4).propose(make_seq([1, 2, 3, 4, 5])) == []
    assert NgramProposer(4).propose(make_seq([1, 2])) == []
    # the only earlier (5, 6) ends just before the last token: its continuation is that last token
    assert NgramProposer(4, min_n=2, max_n=2).propose(make_seq([5, 6, 5, 6])) == [5, 6]


def test_the_index_follows_tokens_as_they_arrive():
    seq = make_seq([4, 5, 6, 7])
    proposer = NgramProposer(3, min_n=1, max_n=2)
    assert proposer.propose(seq) == []
    seq.token_ids += [4, 5]
    assert proposer.propose(seq) == [6, 7, 4]
    seq.token_ids += [0, 1]  # a new continuation: the index keeps the latest occurrence of (1,)
    seq.token_ids += [2, 1]
    assert proposer.propose(seq) == [2, 1]
    # an index built in one go answers the same as one built token by token
    assert NgramProposer(3, min_n=1, max_n=2).propose(make_seq(list(seq.token_ids))) == [2, 1]


@pytest.mark.parametrize("args", [(0, 2, 4), (4, 0, 4), (4, 3, 2)])
def test_bad_settings_are_rejected_by_name(args):
    with pytest.raises(ValueError, match="num_speculative_tokens|prompt_lookup"):
        NgramProposer(*args)
