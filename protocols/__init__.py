"""Protocol plugins: one import per plugin, sorted. Importing registers them."""

from protocols import fewshot as fewshot
from protocols import knn as knn
from protocols import linear as linear
