"""Protocol plugins: one import per plugin, sorted. Importing registers them."""

from protocols import detection as detection
from protocols import fewshot as fewshot
from protocols import finetune as finetune
from protocols import knn as knn
from protocols import linear as linear
from protocols import linear_sgd as linear_sgd
from protocols import lowshot_svm as lowshot_svm
from protocols import semisup as semisup
from protocols import svm as svm
